// as_header: the AssemblyScript SDK (@solo-io/proxy-runtime 0.1.8, ABI 0.2.0) test plugin.
// Adds the response header "x-as-header: <plugin configuration>" ("x-as-header: none" when the
// configuration is empty), for root_id "as_header" (and "" for configs without a root_id).
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext, Context, registerRootContext, FilterHeadersStatusValues, stream_context,
} from "@solo-io/proxy-runtime";
import * as imports from "@solo-io/proxy-runtime/imports";
import { BufferTypeValues } from "@solo-io/proxy-runtime/runtime";

class AsHeaderRoot extends RootContext {
  config: string = "";

  createContext(context_id: u32): Context {
    return new AsHeader(context_id, this);
  }

  // The SDK's onConfigure passes configuration_size where the out-pointer for the size belongs;
  // read the configuration ourselves with proxy_get_buffer_bytes.
  onConfigure(configuration_size: u32): bool {
    const data = new ArrayBuffer(8);
    const ptrs = changetype<usize>(data);
    const rc = imports.proxy_get_buffer_bytes(
      BufferTypeValues.PluginConfiguration, 0, configuration_size, ptrs, ptrs + 4);
    if (rc == 0) {
      const p = load<u32>(ptrs);
      const n = load<u32>(ptrs + 4);
      this.config = String.UTF8.decodeUnsafe(p, n);
    }
    return true;
  }
}

class AsHeader extends Context {
  root: AsHeaderRoot;

  constructor(context_id: u32, root_context: AsHeaderRoot) {
    super(context_id, root_context);
    this.root = root_context;
  }

  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const value = this.root.config.length > 0 ? this.root.config : "none";
    stream_context.headers.response.add("x-as-header", value);
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32): RootContext => new AsHeaderRoot(context_id), "as_header");
registerRootContext((context_id: u32): RootContext => new AsHeaderRoot(context_id), "");
