"""The findings: rules that turn a trace (steps, ledger, evaluation audits) into named findings, and their thresholds."""
