"""Simulated environments for closed-loop evaluation of pi0-family policies (LIBERO: envs.libero)."""
