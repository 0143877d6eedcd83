"""The node's database: instances, the job queue, the delivery outbox and the audit events."""
