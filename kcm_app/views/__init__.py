"""Page bodies: each takes the workspace and the page's widget values, calls ``kcm_app`` and draws.

The scripts in ``pages/`` stay thin (docstring, title, guard, widgets, one call here)."""
