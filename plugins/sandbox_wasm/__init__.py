"""WebAssembly sandbox plugin (wasmtime): Python workflows (python-wasm) and raw modules (wasm)."""
