"""Streamlit glue for the KCM Explorer: session-state schema, cached wrappers, chart data, figures.

The import direction is one way: ``pages`` -> ``kcm_app`` -> ``kcm_core``. Modules that import
Streamlit are ``resources``, ``ui``, ``sidebar``, ``views`` and ``navigation`` (inside its functions: app.py
draws its loading view before anything imports torch); everything else here (``state``'s
parsing, ``store``, ``engine``, ``charts``, ``figures``, ``toy``, ``projection``, ``latency``,
``report``) is plain Python, tested without a running app.
"""
