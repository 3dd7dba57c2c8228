"""The application: the `fit` command, the stdio server, the job they share, the doctor."""
