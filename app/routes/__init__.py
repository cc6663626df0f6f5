"""HTTP routes: classify, tasks (list/show/upload/delete), health and metrics."""
