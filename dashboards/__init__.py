"""The etrm-dash Dash app (built in a later step): run loading, figure builders and pages."""
