"""Pure cost functions shared by the analytic model and the discrete-event engine."""
