"""The backend comparison: problem sets, the independent reference solver, the report."""
