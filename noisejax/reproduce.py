"""Deprecated alias of :mod:`noisejax.study.reproduce` (``noisejax reproduce``); import from there."""

from noisejax._deprecated import forwarder

__all__: list = []
__getattr__ = forwarder("reproduce", "noisejax.study.reproduce", {
    "atomic_write_bytes": ("noisejax.study.files", "atomic_write_bytes"),
    "atomic_write_json": ("noisejax.study.files", "atomic_write_json"),
    "safe_join": ("noisejax.study.files", "safe_join"),
    "to_jsonable": ("noisejax.study.files", "to_jsonable"),
    "fingerprint": ("noisejax.study.files", "fingerprint"),
    "read_checked_json": ("noisejax.study.files", "read_checked_json"),
    "write_checked_json": ("noisejax.study.files", "write_checked_json"),
    "cached_point": ("noisejax.study.files", "cached_point"),
    "save_arrays": ("noisejax.study.files", "save_arrays"),
    "load_arrays": ("noisejax.study.files", "load_arrays"),
    "code_digest": ("noisejax.study.files", "code_digest"),
    "claim": ("noisejax.study.claims", "claim"),
    "claims_summary": ("noisejax.study.claims", "claims_summary"),
    "claims_summary_line": ("noisejax.study.claims", "claims_summary_line"),
    "Claim": ("noisejax.study.claims", "Claim"),
    "Result": ("noisejax.study.claims", "Result"),
})
