"""What drives the engine from outside: synthetic GGUFs, benchmarks, perplexity, llama.cpp runs."""
