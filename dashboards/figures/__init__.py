"""Figure builders: pure functions from bucketed frames (``dashboards.runs``) to Plotly figure dicts. No I/O, no Dash.

One module per tab of the run view, on the house style of ``base``: ``overview`` (loss, accuracy), ``coverage``,
``halting``, ``timing``, ``alignment``, and ``compare`` for the compare page (the Samples tab's charts live in
``dashboards.samples``). Import each builder from its module.
"""
