"""Restart safety: a real server process killed with SIGKILL mid-job and started again."""
