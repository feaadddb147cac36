"""The PNI layers and what acts on whole models: NoisyConv2d / NoisyLinear / NoiseInjection (layers), their
noise calls (noise_calls), convert / strip (convert), whole-model noise batching (batching), noise switches
(control) and optimizer groups (optim). Public names are re-exported once, by pni_fast itself."""
