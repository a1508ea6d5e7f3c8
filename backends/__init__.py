"""Built-in vendor backends, one file each (installed as ``devlayer.backends``).

Only modules in this package touch ``torch.cuda``, ``torch.xpu``, ``torch.mps``, IPEX or
oneCCL; a test enforces it. To add a vendor, add one file with a :class:`devlayer.Backend`
subclass and one line to ``devlayer.registry.BUILTINS`` (or ship it as a plugin through the
``devlayer.backends`` entry-point group).
"""
