"""toolkit.runtime: engines with in-flight batching over exported artifacts."""


def load_engine(engine_dir, **options):
    """An unstarted engine for ``engine_dir`` (see ``toolkit.runtime.engines.load_engine``)."""
    from toolkit.runtime.engines import load_engine as _load

    return _load(engine_dir, **options)
