"""The nccl transport's device slots and group code run through gloo, which lets two processes
share one GPU (NCCL needs a GPU per member): how one GPU checks the device side of the c10d
transports. Registered by the GPU test and its rank processes; needs CUDA to import."""

from weightstream.protocol.transports import register
from weightstream.protocol.transports.nccl import DeviceC10dTransport

NAME = "gloo_cuda"
TRANSPORT = DeviceC10dTransport(NAME, "gloo")

register(NAME, __name__)
