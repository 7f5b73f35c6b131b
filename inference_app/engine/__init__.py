"""The engine: the only package that imports torch (and transformers, peft). One thread runs every generation,
sharing each forward pass among the requests in flight. engine_loop reads schedule -> run -> accept: the scheduler
admits waiting requests (slots and blocks from the block manager), the model runner prefills them and runs the decode
step over the KV cache (CUDA graphs on a GPU, sampling on the device), and the output processor turns tokens into text
on a thread of its own (detokenizer). model_loading reads the model and its adapter."""
