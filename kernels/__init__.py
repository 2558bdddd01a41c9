"""DMS kernels (installed as ``dms_kernels``): leaf ops that know no model or config.

Each op lives in its own sub-package with a pure-PyTorch fp32 reference beside the Triton kernel.
"""
