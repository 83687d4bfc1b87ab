"""cage_kernels: QuEST / CAGE compute ops, each a Triton kernel with a plain-torch twin.

Depends on torch and triton only. The torch twins (``*_ref``) are the ground truth and
the CPU path; ``dispatch`` picks the implementation per device and ``ops`` is the public
surface. One op per Triton file (kernel + launcher): quest_triton (QuEST rows, packed or
not), hadamard_triton (block Hadamard, optionally masked), pack_triton, dequant_triton,
cage_adamw_triton (the fused CAGE-AdamW shard step over a segments.SegmentTable);
triton_lib holds their shared device functions.
"""
