// loaded_modules.mjs: preloaded (`node --import`) by tests/test_bridge.py: at exit, prints to
// stderr the internal modules and bindings this process loaded (process.moduleLoadList).
process.on("exit", () => process.stderr.write(`loaded: ${JSON.stringify(process.moduleLoadList)}\n`));
