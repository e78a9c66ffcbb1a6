"""toolkit.runtime: engines with in-flight batching over exported artifacts."""


def load_engine(engine_dir, **options):
    """An unstarted engine for ``engine_dir`` (see ``toolkit.runtime.loader.load_engine``)."""
    from toolkit.runtime.loader import load_engine as _load

    return _load(engine_dir, **options)
