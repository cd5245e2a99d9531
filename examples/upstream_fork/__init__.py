"""A fork-shaped ETRM example (our code, upstream's shapes): what a researcher's fork of upstream TRM with an encoder
looks like, to trace with ``diagnostics.session`` without touching its model or loss code. See README in
docs/own-loop.md ("A fork as it is")."""
