/* The C entry points TensorRT's Python bindings import (nm -D --undefined-only on tensorrt.so
 * of 10.3 and 11.4), defined with no behaviour: enough for the module to load, so its classes,
 * methods, enums and signatures can be read on a machine without libnvinfer. Never called:
 * creating a Builder or Runtime would need the real library. libc's dlopen/dlsym (11.x) are
 * not stubbed. Compiled once per soname (libnvinfer, libnvonnxparser, libnvinfer_plugin). */
void *createInferBuilder_INTERNAL(void *logger, int version) { return 0; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) { return 0; }
void *createInferRuntime_INTERNAL(void *logger, int version) { return 0; }
void *getBuilderPluginRegistry(int capability) { return 0; }
void *getPluginRegistry(void) { return 0; }
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version) { return 0; }
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version) { return 0; }
int getNvOnnxParserVersion(void) { return 0; }
int initLibNvInferPlugins(void *logger, const char *ns) { return 0; }
