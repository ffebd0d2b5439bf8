"""CUDA IPC transport: GPU slots shared between processes on one node.

``slots`` holds both sides (the sender's cudaMalloc'd slots and a rank's opened handles) and
imports cuda-bindings; ``wire`` holds the handle descriptor and the device identity, which
import anywhere (a rank without CUDA still says who it is in HELLO).
"""
