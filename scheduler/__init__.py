"""The scheduler service: one leader (a Redis lease) folds the event log and dispatches ready tasks."""
