"""Registry entry of the 2D supervised baseline (``supervised2d``); the method lives in ``supervised.py``."""
from backend.methods.supervised import Supervised2D

METHOD = Supervised2D
