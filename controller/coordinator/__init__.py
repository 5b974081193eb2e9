"""The `llama-server` coordinators: one per loaded model, each over the rpc-servers its plan names."""
