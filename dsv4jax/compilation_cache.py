"""JAX's persistent compilation cache for the command-line programs (serve, eval, train): a restarted program
loads its compiled executables, and XLA's per-fusion GPU autotuning results, from disk instead of compiling again.
Compiling V4-Flash's two serving steps over 8 GPUs took 351 s (bench/results/multi-gpu-nvidia-h200-x8-full-model.json).

The cache is keyed by the program, jax version, device and flags, so a stale entry is never used; the directory may
be deleted at any time.
"""

from __future__ import annotations

import os

ENVIRONMENT = "DSV4JAX_COMPILATION_CACHE"


def default_directory() -> str:
    """$DSV4JAX_COMPILATION_CACHE, else $XDG_CACHE_HOME/dsv4jax/xla (~/.cache/dsv4jax/xla)."""
    if os.environ.get(ENVIRONMENT):
        return os.environ[ENVIRONMENT]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dsv4jax", "xla")


def add_argument(parser) -> None:
    parser.add_argument("--compilation-cache", default=default_directory(), metavar="DIR",
                        help="persistent compilation cache, so a restart does not compile again (default: %(default)s; "
                             f"also ${ENVIRONMENT}); 'none' turns it off")


def enable(directory: str | None, min_compile_seconds: float = 1.0) -> str | None:
    """Use `directory` for compiled executables taking at least `min_compile_seconds` to compile; None or 'none'
    leaves caching off. Returns the directory in use."""
    if directory is None or directory.lower() in ("", "none", "off"):
        return None
    import jax

    directory = os.path.abspath(os.path.expanduser(directory))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--compilation-cache {directory}: cannot create it ({error.strerror}); name a writable "
                         f"directory or 'none'") from None
    if not os.access(directory, os.W_OK):
        raise ValueError(f"--compilation-cache {directory}: not writable; name a writable directory or 'none'")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    return directory
