"""`sglora-edge bench`: the latency harness a deployer runs on their own device (numpy + ONNX Runtime, no torch).

    sglora-edge bench --bundle bundle/ --out bench/                    # any exported bundle, torch-free
    sglora-edge bench --synthetic sglora-tiny --synthetic ViT-B-16 --out bench/   # random weights (needs torch)

Every timing is ms per call after `warmup` untimed calls: p50 / p90 / p99 / mean / std over `repeats`
calls (fewer, at least 2, where a stage would overrun --stage-budget seconds; `n` records how many).
ONNX Runtime's `run()` returns host arrays, so a GPU's work is finished inside the timed region.
Nothing here asserts on time; compare numbers only from one machine under one load.

results.json (schema "sglora-edge-bench/1", `check_schema` holds it):

    schema, created (UTC ISO), command (argv), settings {backend, threads, batches, gallery_size,
        switch_gallery, repeats, warmup, library_sizes, retrieval_sizes}
    machine     cpu_model, cpu_flags (the instruction sets results depend on: avx2, avx512*, *vnni, *bf16, amx_*),
                kernel, logical_cpus, usable_cpus, memory_gb, load_average, gpu (nvidia-smi rows or null),
                jetson_power_mode (or null), versions {python, numpy, onnxruntime, tensorrt, torch, openvino, nncf},
                openvino_capabilities (what OpenVINO's CPU plugin computes natively, or null),
                ort_available_providers, env {OMP_NUM_THREADS, ...}, matmul_probe {gflops, n, threads}
    bundles     one per bundle: label, path, role ("main": every stage; "switch": task switch only), switch_images
                (--switch-gallery, or fewer where re-encoding them 3 times would overrun --stage-budget),
                backbone, lora {size, blocks, last_blocks}, backend (what `run` records, with the providers used),
                stages {name: stats}, cold_start (main only), throughput (main only), torch ({name: stats} or null)
        stats       {p50, p90, p99, mean, std (ms per call), n (timed calls), per (items per call)}
        stage names tokenize, description_embedding (tokenize + graph), aggregation, generation_S1 and _S5
                    (noise draw + prior + decode), lora_handover_input (binding the vector), lora_handover_merged
                    (activating a new LoRA in merged mode: fold γ·B·A into W, free the previous session, build
                    the next), image_preprocess (decode + resize + crop +
                    normalise, per = images), gallery_prefix_b<B>, task_switch_suffix_b<B> (input mode),
                    task_switch_suffix_merged_b<B>, text_query, retrieval (rank one query over the gallery's
                    cached features), end_to_end_warm (description -> ranked results on a cached gallery),
                    switch_cached (switch_gallery images: a new LoRA -> features from cached activations),
                    switch_reencode (the same, re-running the whole visual tower on decoded pixels)
        cold_start  {process_start, imports, bundle_verified, sessions_ready, first_result, total (ms from the
                    parent's spawn), peak_rss_mb, repeats}: each phase in a fresh process, first result =
                    generate + search over a cold cache of min(gallery_size, 8) images
        throughput  {macs_per_image {prefix, suffix, total}, images_per_s, gflops, fraction_of_peak}
                    at the largest batch, from the prefix + suffix p50s and the matmul probe
    comparisons torch_vs_ort {label: {stage: {torch_ms, ort_ms, speedup}}}, lora_modes {label: {b<B>: {input_ms,
                merged_ms, merged_over_input}, handover_input_ms, handover_merged_ms}}, generation_vs_training
                {label: {generate_ms, train_s, epochs, images, ratio}}, task_switch {backbone: {images,
                reencode_all_ms, cached_ms {L: ms}, speedup {L: x}}}, int8 (with --int8) {label: {bundle, quantized,
                b<B>: {fp32_ms, int8_ms, speedup} (prefix + suffix), recall {fp32_mean_r1, int8_mean_r1, change,
                tasks, galleries} or null (no --recall-world, or random weights)}}, precisions (with --openvino)
                {label: {batches, calibration, rows [{engine, backend, precision, graphs, ms {b<B>: prefix + suffix
                p50}, speedup {b<B>: over ONNX Runtime fp32}, cold_start_ms, sessions_ready_ms, peak_rss_mb,
                min_cosine (image features against ONNX Runtime fp32), mean_r1, r1_change, refused (why a row
                could not run, else null)}]}}
    tuning      per main bundle (unless --no-tuning): {bundle, batch, usable_cpus, rows [{threads,
                graph_optimization, suffix_ms_per_image, load_ms, n}], best {..., speedup_over_default}}
    scaling     library {sizes, generate_ms, state_mb, peak_mb, slope_time, slope_memory, growth, skipped},
                retrieval {sizes, ms, state_mb, slope_time, growth}; slopes are log-log least squares over
                the sizes >= the second one (the smallest is dominated by fixed costs)
    peak_rss_mb this harness's own peak; gpu_memory_mb (what it holds on the GPU at the end, null without one);
    notes (what was skipped and why); charts (PNG files written beside it)
"""

from .command import bench_command, run_bench
from .measure import DESC, MATMUL_ONNX, QUERY, STATS, loglog_slope, measure, peak_rss_mb
from .report import SCHEMA, check_schema, markdown
from .stages import label_of

__all__ = ["DESC", "MATMUL_ONNX", "QUERY", "SCHEMA", "STATS", "bench_command", "check_schema", "label_of",
           "loglog_slope", "markdown", "measure", "peak_rss_mb", "run_bench"]
