"""toolkit.server: the Litestar HTTP API (OpenAI and Workers AI schemas) over runtime engines.

Import ``toolkit.server.app.create_app`` to build the app, ``toolkit.server.serve.serve`` to run it.
"""
