"""The paper's quantization baselines: QSGD with Elias coding, TernGrad, l_q quantization (Section 4)."""
