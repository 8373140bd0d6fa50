"""AMDIM (Bachman et al., 2019): model, multiscale NCE objective and trainer on amdim_kernels."""
