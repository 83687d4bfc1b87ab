"""cage_kernels: QuEST / CAGE compute ops, each a Triton kernel with a plain-torch twin.

Depends on torch and triton only. The torch twins (``*_ref``) are the ground truth and
the CPU path; ``dispatch`` picks the implementation per device.
"""
