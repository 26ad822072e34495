"""cellrep: learn representations of single cells from microscopy images.

Layers, bottom to top: ``errors``, ``hostmem`` < ``data``, ``models`` < ``train`` < ``infer``
< ``profiling``, ``eval`` < ``tasks`` < ``launch``. A module imports only from
layers beneath it.
"""

__version__ = "0.1.0"
