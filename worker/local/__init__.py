"""The embedded stack for `demo` and tests: a local Rekognition Video emulator and its data generator."""
