"""``serve``: one lifecycle for a single process, the supervisor and each of its workers."""
