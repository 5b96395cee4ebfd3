"""One module per page. Each ``page()`` draws the title, stops with an explanation while no model is
loaded, draws the page's widgets (``controls``, returning plain values) and hands them to ``body``,
which calls ``kcm_app`` and draws the charts.

The scripts in ``pages/`` stay thin: docstring, ``if ui.entry_guard():``, one call to ``page()`` here."""
