"""napari-semiseg: the napari plugin (a thin Qt layer over ``backend``)."""
__version__ = "0.1.0"
