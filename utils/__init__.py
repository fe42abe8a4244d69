"""Helpers shared by the scripts: config, data, runtime (device/AMP/seed), checkpoints."""
