"""Helpers every package of this project uses: configs, files written safely, devices.

This package imports nothing of ours, so any package may import it.
"""
