"""The Hub and publication: resolve and download models, push folders, model cards, `verify`."""
