/**
 * Chat templates of the model families the generator writes, as the families' own tokenizer
 * configs ship them (Jinja text in `tokenizer.chat_template`), with the control tokens each needs.
 * llama.cpp does not run Jinja here: it recognises a family by substrings of this text
 * (llm_chat_detect_template) and renders with its built-in formatter, so the text must be the
 * family's real one for the detection to pick the same formatter a real model gets.
 */

export interface TemplateFamily {
  /** Jinja text, as the family's tokenizer_config.json has it. */
  text: string;
  /** Control tokens the template's text uses (become CONTROL tokens of the vocabulary). */
  control: readonly string[];
  /** The token that ends a turn (tokenizer.ggml.eot_token_id); `</s>` for templates that use EOS. */
  endOfTurn: string;
  /** Tokens the family's tokenizer adds as text, not control (Qwen3's `<think>`: USER_DEFINED tokens of the vocabulary). */
  userDefined?: readonly string[];
}

/** The think-block markers of the reasoning families (Qwen3, Qwen3.5, LFM2.5): tokens of their own, rendered as text. */
const THINK_TOKENS = ['<think>', '</think>'] as const;

/** Qwen2.5-Instruct's template (verbatim): ChatML, tools in the system turn, calls in <tool_call> tags (Hermes). */
const QWEN_CHATML = String.raw`{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
`;

/**
 * Qwen3's template, abridged (the bookkeeping that keeps the last reasoning of a multi-step tool turn
 * left out): ChatML, tools in the system turn, calls in <tool_call> tags, results in <tool_response>
 * tags of a user turn; past replies drop their thinking.
 */
const QWEN3_CHATML = String.raw`{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not (tools and loop.first)) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- if '</think>' in content %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}`;

/** Meta-Llama-3-8B-Instruct. */
const LLAMA3 = String.raw`{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}`;

/** Gemma 3 (text part): the system prompt joins the first user turn; the assistant is "model". */
const GEMMA3 = String.raw`{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{ message['content'] | trim }}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
`;

/** Phi-3-mini-4k-instruct. */
const PHI3 = String.raw`{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}`;

/** Mistral-7B-Instruct-v0.3 (tool schema rendering shortened; llama.cpp's "mistral-v3" formatter). */
const MISTRAL = String.raw`{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is defined and tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] " + (tools | tojson) + "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
`;

/**
 * Qwen3.5 (Qwen3.5-4B's tokenizer config; the vision, video and tool-calling branches left out:
 * llama.cpp's formatter ignores them). Replies after the last question carry their thinking; the
 * generation prompt opens a think block.
 */
const QWEN35 = String.raw`{%- if not messages %}
    {{- raise_exception('No messages provided.') }}
{%- endif %}
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content|trim + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- if message.role == "user" %}
        {%- set ns.last_query_index = (messages|length - 1) - loop.index0 %}
        {%- break %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content|trim %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content|trim + '\n</think>\n\n' + content }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- else %}
        {{- '<think>\n' }}
    {%- endif %}
{%- endif %}`;

/** LFM2.5-Instruct (Liquid AI): ChatML after the BOS, tools listed in the system prompt, past thinking dropped. */
const LFM2 = String.raw`{{- bos_token -}}
{%- set keep_past_thinking = keep_past_thinking | default(false) -%}
{%- set ns = namespace(system_prompt="") -%}
{%- if messages[0]["role"] == "system" -%}
    {%- set ns.system_prompt = messages[0]["content"] -%}
    {%- set messages = messages[1:] -%}
{%- endif -%}
{%- if tools -%}
    {%- set ns.system_prompt = ns.system_prompt + ("\n" if ns.system_prompt else "") + "List of tools: [" -%}
    {%- for tool in tools -%}
        {%- if tool is not string -%}
            {%- set tool = tool | tojson -%}
        {%- endif -%}
        {%- set ns.system_prompt = ns.system_prompt + tool -%}
        {%- if not loop.last -%}
            {%- set ns.system_prompt = ns.system_prompt + ", " -%}
        {%- endif -%}
    {%- endfor -%}
    {%- set ns.system_prompt = ns.system_prompt + "]" -%}
{%- endif -%}
{%- if ns.system_prompt -%}
    {{- "<|im_start|>system\n" + ns.system_prompt + "<|im_end|>\n" -}}
{%- endif -%}
{%- set ns.last_assistant_index = -1 -%}
{%- for message in messages -%}
    {%- if message["role"] == "assistant" -%}
        {%- set ns.last_assistant_index = loop.index0 -%}
    {%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
    {{- "<|im_start|>" + message["role"] + "\n" -}}
    {%- set content = message["content"] -%}
    {%- if content is not string -%}
        {%- set content = content | tojson -%}
    {%- endif -%}
    {%- if message["role"] == "assistant" and not keep_past_thinking and loop.index0 != ns.last_assistant_index -%}
        {%- if "</think>" in content -%}
            {%- set content = content.split("</think>")[-1] | trim -%}
        {%- endif -%}
    {%- endif -%}
    {{- content + "<|im_end|>\n" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<|im_start|>assistant\n" -}}
{%- endif -%}`;

/**
 * Gemma 4 (google/gemma-4-31B-it; the tool, thinking-channel and multimodal branches left out).
 * llama.cpp v0.4.0 has no formatter for it (llm_chat_detect_template: unknown), so chats of such a
 * model are framed with ChatML, as for any template llama.cpp does not know.
 */
const GEMMA4 = String.raw`{{- bos_token -}}
{%- set loop_messages = messages -%}
{%- if messages[0]['role'] in ['system', 'developer'] -%}
    {{- '<|turn>system\n' -}}
    {%- if enable_thinking is defined and enable_thinking -%}
        {{- '<|think|>\n' -}}
    {%- endif -%}
    {{- messages[0]['content'] | trim -}}
    {{- '<turn|>\n' -}}
    {%- set loop_messages = messages[1:] -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{- '<|turn>' + role + '\n' + message['content'] | trim + '<turn|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|turn>model\n' -}}
    {%- if not (enable_thinking is defined and enable_thinking) -%}
        {{- '<|channel>thought\n<channel|>' -}}
    {%- endif -%}
{%- endif -%}`;

/**
 * gpt-oss (openai/gpt-oss-20b's harmony template, abridged: the tool, reasoning-effort and
 * thinking branches left out). llama.cpp picks its gpt-oss formatter by `<|start|>` and `<|channel|>`
 * and renders every message as `<|start|>role<|message|>content<|end|>` (an assistant's ends with
 * `<|return|>`), which is what chats of such a model are framed with.
 */
const HARMONY = String.raw`{#- Abridged from openai/gpt-oss-20b chat_template.jinja -#}
{%- macro render_system_message(model_identity, reasoning_effort) -%}
    {{- model_identity + "\n" }}
    {{- "Knowledge cutoff: 2024-06\n" }}
    {{- "\nReasoning: " + reasoning_effort + "\n\n" }}
    {{- "# Valid channels: analysis, commentary, final. Channel must be included for every message." }}
{%- endmacro -%}
{{- "<|start|>system<|message|>" }}
{{- render_system_message("You are ChatGPT, a large language model trained by OpenAI.", reasoning_effort | default("medium")) }}
{{- "<|end|>" }}
{%- if messages[0].role == "developer" or messages[0].role == "system" %}
    {{- "<|start|>developer<|message|># Instructions\n\n" + messages[0].content + "<|end|>" }}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages -%}
    {%- if message.role == "assistant" -%}
        {%- if "thinking" in message and loop.last %}
            {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" }}
        {%- endif %}
        {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|end|>" }}
    {%- elif message.role == "user" -%}
        {{- "<|start|>user<|message|>" + message.content + "<|end|>" }}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|start|>assistant
{%- endif -%}`;

/**
 * GLM-4.5 (zai-org/GLM-4.5-Air's, abridged: the tool and observation branches left out). llama.cpp
 * knows it by `[gMASK]<sop>` and frames it as ChatGLM-4: `<|role|>` then a newline before each
 * message, the conversation opened once; a reply ends where the model writes `<|user|>` (its end of
 * turn). Past replies are rendered with an empty think block.
 */
const GLM4 = String.raw`[gMASK]<sop>
{%- for m in messages %}
    {%- if m.role == 'system' %}
        {{- '<|system|>
' + m.content }}
    {%- elif m.role == 'user' %}
        {{- '<|user|>
' + m.content }}
    {%- elif m.role == 'assistant' %}
        {%- set content = m.content %}
        {%- if '</think>' in content %}
            {%- set content = content.split('</think>')[-1].strip() %}
        {%- endif %}
        {{- '<|assistant|>
<think></think>
' + content.strip() }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>' }}
    {%- if enable_thinking is defined and not enable_thinking %}
        {{- '
<think></think>' }}
    {%- endif %}
{%- endif %}`;

/**
 * DeepSeek-V3/R1 (deepseek-ai/DeepSeek-R1's, abridged: the tool branches left out). llama.cpp knows it
 * by `<｜User｜>`, `<｜Assistant｜>` and `<｜end▁of▁sentence｜>`; a past reply is rendered after its
 * last `</think>`.
 */
const DEEPSEEK3 = String.raw`{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}
{%- set ns = namespace(system_prompt='') %}
{%- for message in messages %}{%- if message['role'] == 'system' %}{%- set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}
{{- bos_token }}{{- ns.system_prompt }}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {{- '<｜User｜>' + message['content'] }}
    {%- elif message['role'] == 'assistant' %}
        {%- set content = message['content'] %}
        {%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}
        {{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<｜Assistant｜><think>
' }}{%- endif %}`;

/**
 * Magistral (mistralai/Magistral-Small-2509's, abridged: the tool and multimodal branches and the
 * default system prompt left out): llama.cpp frames it as Mistral v7 (`[SYSTEM_PROMPT]` tells it);
 * replies think between `[THINK]` and `[/THINK]`.
 */
const MAGISTRAL = String.raw`{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {{- '[SYSTEM_PROMPT]' + messages[0]['content'] + '[/SYSTEM_PROMPT]' }}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {{- '[INST]' + message['content'] + '[/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}`;

/** DeepSeek-V2-Lite-Chat (verbatim): a turn ends with the end-of-sentence token. */
const DEEPSEEK2 = String.raw`{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}`;

/**
 * Granite 4.0 (ibm-granite/granite-4.0-h-small, abridged: the tool and document branches left out;
 * llama.cpp tells it from Granite 3 by its tool tags and default system message).
 */
const GRANITE4 = String.raw`{%- set tools_system_message_prefix = 'You are a helpful assistant with access to the following tools. You may call one or more tools to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' %}
{%- set tools_system_message_suffix = '\n</tools>\n\nFor each tool call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>.' %}
{%- set g4_default_system_message = 'You are a helpful assistant. Please ensure responses are professional, accurate, and safe.' %}
{%- set ns = namespace(system_message='') %}
{%- if messages[0].role == 'system' %}
    {%- set ns.system_message = messages[0].content %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if ns.system_message %}
    {{- '<|start_of_role|>system<|end_of_role|>' + ns.system_message + '<|end_of_text|>\n' }}
{%- else %}
    {{- '<|start_of_role|>system<|end_of_role|>' + g4_default_system_message + '<|end_of_text|>\n' }}
{%- endif %}
{%- for message in loop_messages %}
    {{- '<|start_of_role|>' + message.role + '<|end_of_role|>' + message.content + '<|end_of_text|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_of_role|>assistant<|end_of_role|>' }}
{%- endif %}`;

export const TEMPLATES = {
  chatml: { text: QWEN_CHATML, control: [], endOfTurn: '<|im_end|>' },
  qwen3: { text: QWEN3_CHATML, control: [], endOfTurn: '<|im_end|>', userDefined: THINK_TOKENS },
  qwen35: { text: QWEN35, control: ['<|vision_start|>', '<|vision_end|>', '<|image_pad|>', '<|video_pad|>'], endOfTurn: '<|im_end|>', userDefined: THINK_TOKENS },
  // Not <|tool_response>: with it in the vocabulary llama.cpp drops </s> from the end-of-generation tokens.
  gemma4: { text: GEMMA4, control: ['<|turn>', '<turn|>', '<|channel>', '<channel|>', '<|think|>'], endOfTurn: '<turn|>' },
  // The tool markers are control tokens, as in LiquidAI's vocabulary (a call's marker is then no text of the reply).
  lfm2: { text: LFM2, control: ['<|startoftext|>', '<|tool_list_start|>', '<|tool_list_end|>', '<|tool_call_start|>', '<|tool_call_end|>', '<|tool_response_start|>', '<|tool_response_end|>'], endOfTurn: '<|im_end|>', userDefined: THINK_TOKENS },
  llama3: { text: LLAMA3, control: ['<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>'], endOfTurn: '<|eot_id|>' },
  gemma: { text: GEMMA3, control: ['<start_of_turn>', '<end_of_turn>'], endOfTurn: '<end_of_turn>' },
  phi3: { text: PHI3, control: ['<|system|>', '<|user|>', '<|assistant|>', '<|end|>'], endOfTurn: '<|end|>' },
  // <|call|> too: with <|return|> and it in the vocabulary llama.cpp stops treating <|end|> (which ends a
  // thinking message) as the end of generation, as for the real models.
  harmony: { text: HARMONY, control: ['<|start|>', '<|message|>', '<|channel|>', '<|constrain|>', '<|end|>', '<|return|>', '<|call|>'], endOfTurn: '<|return|>' },
  // <|user|> ends a reply (the GGUF's end-of-turn token), as in GLM-4.5's.
  deepseek3: { text: DEEPSEEK3, control: ['<｜User｜>', '<｜Assistant｜>', '<｜end▁of▁sentence｜>'], endOfTurn: '<｜end▁of▁sentence｜>', userDefined: THINK_TOKENS },
  glm4: { text: GLM4, control: ['[gMASK]', '<sop>', '<|system|>', '<|user|>', '<|assistant|>', '<|observation|>'], endOfTurn: '<|user|>', userDefined: THINK_TOKENS },
  // llama.cpp's formatter writes the real end-of-sentence text after each answer, so the vocabulary has it.
  deepseek2: { text: DEEPSEEK2, control: ['<｜end▁of▁sentence｜>'], endOfTurn: '<｜end▁of▁sentence｜>' },
  granite4: { text: GRANITE4, control: ['<|start_of_role|>', '<|end_of_role|>', '<|end_of_text|>', '<|tool_call|>'], endOfTurn: '<|end_of_text|>' },
  magistral: { text: MAGISTRAL, control: ['[SYSTEM_PROMPT]', '[/SYSTEM_PROMPT]', '[INST]', '[/INST]', '[THINK]', '[/THINK]'], endOfTurn: '</s>' },
  mistral: { text: MISTRAL, control: ['[INST]', '[/INST]', '[AVAILABLE_TOOLS]', '[/AVAILABLE_TOOLS]', '[TOOL_CALLS]', '[TOOL_RESULTS]', '[/TOOL_RESULTS]'], endOfTurn: '</s>' },
} as const satisfies Record<string, TemplateFamily>;

export type TemplateName = keyof typeof TEMPLATES;
