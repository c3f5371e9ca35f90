"""Diffusion processes: the DiT noise schedule, timestep respacing, samplers' timestep lists."""
