"""Kept for plugins that imported ImageNet metadata from here: it now lives in the core."""

from xbench.imagenet import class_names, val_labels, wnid_to_index, wnids  # noqa: F401
