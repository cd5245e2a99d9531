"""etrm-dash: the Dash dashboard of traced runs. ``runs`` loads (read-only, bucketed, incremental), ``figures``
builds Plotly figures (pure functions), ``app`` lays out pages and callbacks, ``cli`` serves it."""
