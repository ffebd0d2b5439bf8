"""The trainer side: bucket planning, the slot ring and the ZMQ publisher."""

from .bucket_sender import BucketSender, PushReport, ReceiverResult
from .planner import PlannedBucket, plan_buckets

__all__ = ["BucketSender", "PlannedBucket", "PushReport", "ReceiverResult", "plan_buckets"]
