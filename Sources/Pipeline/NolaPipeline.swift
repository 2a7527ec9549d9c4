import Foundation
import Imaging
import Kernels
import Method
import Models
import Queue

/// The NoLA method as job stages (DESIGN.md, "The method"):
///   validate     parameters (NolaParameters), model folders, an earlier job's prompts — before any work
///   discover     (the queue's stage) every image recorded in nola.images with its SHA-256
///   describe     stage 1: sentences per class (job / LLM with cache / templates) → zero-shot classifier
///   encode       CLIP and DINO features of every image's weak view (feature cache in PostgreSQL)
///   pseudolabel  stage 2: zero-shot labels, top-k pseudo-labels, alignment module, teacher labels
///   tune         stage 3: prompt tuning with checkpoints in nola.checkpoints (resumes after a crash)
///   label        stage 4: a label for every image, the tuned prompts blob, accuracy when folders name classes
/// Each NoLA stage takes the value the one before it returned and returns its own (PipelineValues.swift):
/// validate → `Validated`, describe → `Described`, encode → `Encoded`, pseudolabel → `Taught`,
/// tune → `Tuned`, label. The values live in the attempt's `JobContext`, so a new attempt (a retry,
/// a rescued job) recomputes them: the feature cache and nola.checkpoints make that cheap.
public enum NolaPipeline {
    public static func stages(discover: JobStage) -> [JobStage] {
        [NolaStep(ValidateStage()), discover, NolaStep(DescribeStage()), NolaStep(EncodeStage()),
         NolaStep(PseudoLabelJobStage()), NolaStep(TuneStage()), NolaStep(LabelStage())]
    }
}

/// A stage of the NoLA method: from the previous stage's value to its own.
protocol NolaStage: Sendable {
    associatedtype Input
    associatedtype Output
    /// Shown in nola.jobs.stage and nola.events.stage.
    var name: String { get }
    func run(_ input: Input, _ context: JobContext) throws -> Output
}

/// A NoLA stage as the worker runs it: takes its input from what the stage before handed over in this
/// attempt (validate takes nothing), hands its output to the next.
struct NolaStep<Stage: NolaStage>: JobStage {
    let stage: Stage
    init(_ stage: Stage) { self.stage = stage }
    var name: String { stage.name }

    func run(_ context: JobContext) throws {
        let input: Stage.Input
        if let none = () as? Stage.Input { input = none } else { input = try context.takeHandedOver(Stage.Input.self, stage: name) }
        context.handOver(try stage.run(input, context))
    }
}

/// Seconds since `start`, rounded to milliseconds, as a JSON number.
func seconds(since start: Date) -> JSONValue { .number((Date().timeIntervalSince(start) * 1000).rounded() / 1000) }
func number(_ x: Double) -> JSONValue { .number(x.isFinite ? (x * 1e6).rounded() / 1e6 : 0) }
func number(_ x: Int) -> JSONValue { .number(Double(x)) }

// MARK: validate

/// Parameters, model folders and (inference only) the earlier job's prompts, before any work.
struct ValidateStage: NolaStage {
    let name = "validate"

    func run(_: Void, _ context: JobContext) throws -> Validated {
        let job: JobParameters
        do {
            job = try JobParameters(json: Data(context.parametersJSON.utf8))
        } catch let error as MethodError {
            throw JobError.badInput("\(error)")
        }
        var parameters = job.method
        let promptsFromJob = job.promptsFromJob
        let chosen: [String: String?] = [
            "clip_model": job.given.contains("clip_model") ? parameters.clipModel : nil,
            "dino_model": job.given.contains("dino_model") ? parameters.dinoModel : nil,
        ]
        let given = chosen.compactMapValues { $0 }
        let clip = try modelFolder(context.settings, configured: context.settings.clipModel, parameter: given["clip_model"],
                                   fallback: parameters.clipModel, what: "CLIP")
        // Inference-only jobs need no DINO.
        let dino = promptsFromJob != nil ? nil : try modelFolder(context.settings, configured: context.settings.dinoModel,
                                                                 parameter: given["dino_model"], fallback: parameters.dinoModel, what: "DINO")
        if let id = promptsFromJob {
            let found = try context.withDatabase { try PipelineTables.prompts($0, jobID: id) }
            guard found != nil else { throw JobError.badInput("parameter 'prompts_from_job': job \(id) has no tuned prompts") }
        }
        // Record the folders actually used (the configuration may choose them).
        parameters.clipModel = clip.lastPathComponent
        if let dino { parameters.dinoModel = dino.lastPathComponent }
        let validated = Validated(parameters: parameters, parametersJSON: String(decoding: parameters.encodedJSON(), as: UTF8.self),
                                  clipFolder: clip, dinoFolder: dino, promptsFromJob: promptsFromJob, onlyNew: job.onlyNew)
        try context.recordEvent(stage: name, kind: "parameters", metrics: [
            "parameters": (try? JSONDecoder().decode(JSONValue.self, from: parameters.encodedJSON())) ?? .null,
            "clip_model": .string(clip.path), "dino_model": dino.map { .string($0.path) } ?? .null,
            "prompts_from_job": promptsFromJob.map { .number(Double($0)) } ?? .null, "only_new": .bool(job.onlyNew),
            "threads": number(context.threads),
            "threads_requested": context.threadsRequested.map { number($0) } ?? .null,
            "daemon_threads": number(context.settings.threads),
        ])
        return validated
    }

    /// The model folder: the job's parameter (a folder name under model_root), else the configuration's
    /// path (absolute, or relative to model_root), else the default folder name under model_root.
    func modelFolder(_ config: StageSettings, configured: String?, parameter: String?, fallback: String, what: String) throws -> URL {
        let path: String
        if let parameter {
            guard let root = config.modelRoot else {
                throw JobError.badInput("parameter names \(what) model folder '\(parameter)' but the daemon has no model_root configured")
            }
            path = root + "/" + parameter
        } else if let configured {
            if configured.hasPrefix("/") { path = configured }
            else if let root = config.modelRoot { path = root + "/" + configured }
            else { throw JobError.badInput("\(what) model '\(configured)' is relative but no model_root is configured") }
        } else if let root = config.modelRoot {
            path = root + "/" + fallback
        } else {
            throw JobError.badInput("no \(what) model: configure model_root (or \(what == "CLIP" ? "clip_model" : "dino_model"))")
        }
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir), isDir.boolValue else {
            throw JobError.badInput("\(what) model folder \(path) does not exist")
        }
        guard FileManager.default.fileExists(atPath: path + "/config.json")
                || (what == "CLIP" && FileManager.default.fileExists(atPath: path + "/" + OpenCLIPFolder.configFile)) else {
            throw JobError.badInput("\(what) model folder \(path) has no config.json\(what == "CLIP" ? " (nor \(OpenCLIPFolder.configFile))" : "")")
        }
        return URL(fileURLWithPath: path)
    }
}

// MARK: stage 1

struct DescribeStage: NolaStage {
    let name = "describe"

    func run(_ validated: Validated, _ context: JobContext) throws -> Described {
        let start = Date()
        let clipEntry = try ModelCache.shared.clip(validated.clipFolder)
        try context.checkCancelled()
        let classes = context.classes
        var descriptions: [String: [String]] = [:]
        if let json = context.descriptionsJSON {
            do {
                descriptions = try ClassDescriptions.parse(Data(json.utf8), classes: classes)
            } catch let error as MethodError {
                throw JobError.badInput("\(error)")
            }
        }
        var source: [String: String] = [:]
        for c in classes { source[c] = descriptions[c] != nil ? "job" : "templates" }
        var llmCalls = 0, cacheHits = 0
        if let url = context.settings.llmURL.flatMap(URL.init(string:)) {
            let endpoint = LLMEndpoint(url: url, model: context.settings.llmModel, apiKey: context.settings.llmAPIKey)
            let client = DescriptionClient(endpoint: endpoint)
            for (i, c) in classes.enumerated() where descriptions[c] == nil {
                try context.reportProgress(stage: name, done: i, total: classes.count)
                if let cached = try context.withDatabase({
                    try Results.cachedDescriptions($0, className: c, model: endpoint.model, promptVersion: DescriptionClient.promptVersion)
                }) {
                    descriptions[c] = cached
                    cacheHits += 1
                    source[c] = "cache"
                    continue
                }
                let sentences: [String]
                do {
                    // Asks for the stop flag ten times a second while the endpoint has not answered, so a
                    // cancel, the job's timeout or SIGTERM ends the wait at once.
                    sentences = try client.describe(className: c, shouldStop: { context.stopReason != nil })
                } catch let error as MethodError where error.code == .cancelled {
                    let reason = context.stopReason ?? .shutdown
                    context.logger.info("stopped while waiting for the LLM endpoint", metadata: ["endpoint": "\(client.redactedURL)", "class": "\(c)"])
                    throw context.stopped(reason, while: "waiting for the LLM endpoint \(client.redactedURL) to describe class '\(c)'")
                } catch let error as MethodError {
                    throw JobError.transient("class descriptions: \(error)")
                }
                llmCalls += 1
                try context.withDatabase {
                    try Results.cacheDescriptions($0, className: c, model: endpoint.model, promptVersion: DescriptionClient.promptVersion, sentences: sentences)
                }
                descriptions[c] = sentences
                source[c] = "llm"
            }
        }
        let sentences = ClassDescriptions.sentences(classes: classes, descriptions: descriptions, templates: validated.parameters.templates)
        let clip = clipEntry.model
        let contextLength = clip.textConfig.maxPositionEmbeddings
        let e = clip.projectionDim
        var embeddings: [[Float]] = []
        for (i, list) in sentences.enumerated() {
            try context.reportProgress(stage: name, done: i, total: classes.count)
            let ids = list.map { clipEntry.tokenizer.encode($0, contextLength: contextLength).map(Int32.init) }
            embeddings.append(clip.getTextFeatures(ids))
        }
        let classifier: [Float]
        do {
            classifier = try buildClassifier(embeddings: embeddings, dimension: e)
        } catch let error as MethodError {
            throw JobError.badInput("\(error)")
        }
        try context.reportProgress(stage: name, done: classes.count, total: classes.count)
        var perClass: [String: JSONValue] = [:]
        for (c, list) in zip(classes, sentences) {
            perClass[c] = ["sentences": number(list.count), "source": .string(source[c] ?? "templates")]
        }
        try context.recordEvent(stage: name, kind: "metrics", metrics: [
            "classes": .object(perClass), "llm_calls": number(llmCalls), "cache_hits": number(cacheHits),
            "clip": clipEntry.identity.json, "seconds": seconds(since: start),
        ])
        return Described(validated: validated, clip: clipEntry, classifier: classifier)
    }
}
