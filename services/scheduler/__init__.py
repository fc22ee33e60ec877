"""scheduler: turns a prepared dataset into a resource plan and a scheduled training job."""
