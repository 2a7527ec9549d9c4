import Foundation

/// Where class descriptions come from when the job brings none: an OpenAI-compatible chat-completions
/// endpoint (from the worker's configuration).
public struct LLMEndpoint: Sendable {
    /// Base URL; requests go to `{url}/chat/completions`.
    public var url: URL
    public var model: String
    /// Sent as `Authorization: Bearer <key>`; never appears in errors.
    public var apiKey: String?
    /// Seconds per request.
    public var timeout: Double
    /// `n` of the request: answers asked per question.
    public var answersPerQuestion: Int
    public var temperature: Double
    public var maxTokens: Int

    public init(url: URL, model: String, apiKey: String? = nil, timeout: Double = 60,
                answersPerQuestion: Int = 1, temperature: Double = 0.99, maxTokens: Int = 80) {
        self.url = url
        self.model = model
        self.apiKey = apiKey
        self.timeout = timeout
        self.answersPerQuestion = answersPerQuestion
        self.temperature = temperature
        self.maxTokens = maxTokens
    }
}

/// Asks the endpoint CuPL-style questions about a class and turns the replies into sentences.
/// The daemon caches the result by (class name, `endpoint.model`, `promptVersion`).
public struct DescriptionClient: Sendable {
    /// Changes whenever `questions` or the reply parsing change, so cached descriptions are not reused.
    public static let promptVersion = "cupl-1"
    /// `{}` is the class name (underscores as spaces).
    public static let questions: [String] = [
        "Describe what a {} looks like.",
        "How can you identify a {}?",
        "What does a {} look like?",
        "Describe an image from the internet of a {}.",
        "Write a caption of an image of a {}.",
    ]
    static let systemMessage = "You describe the visual appearance of things in short, factual sentences."

    public let endpoint: LLMEndpoint
    public init(endpoint: LLMEndpoint) { self.endpoint = endpoint }

    /// Asks every question once; returns the sentences of all answers, deduplicated, in order.
    /// Runs on the caller's thread; `shouldStop` is asked about ten times a second while a request waits,
    /// and a true answer ends the request and throws `.cancelled` (see `HTTPRequest`).
    public func describe(className: String, shouldStop: () -> Bool = { false }) throws -> [String] {
        let name = className.replacingOccurrences(of: "_", with: " ")
        var sentences: [String] = []
        var seen = Set<String>()
        for question in Self.questions {
            let answers = try complete(question.replacingOccurrences(of: "{}", with: name), shouldStop: shouldStop)
            for answer in answers {
                for s in Self.sentences(fromReply: answer) where seen.insert(s).inserted { sentences.append(s) }
            }
        }
        guard !sentences.isEmpty else {
            throw MethodError(.llmBadReply, redactedURL, "no sentences for class '\(className)'")
        }
        return sentences
    }

    /// The request body for one question (also what tests assert).
    func requestBody(question: String) -> Data {
        let body: [String: Any] = [
            "model": endpoint.model,
            "messages": [
                ["role": "system", "content": Self.systemMessage],
                ["role": "user", "content": question],
            ],
            "n": endpoint.answersPerQuestion,
            "temperature": endpoint.temperature,
            "max_tokens": endpoint.maxTokens,
        ]
        return try! JSONSerialization.data(withJSONObject: body, options: [.sortedKeys])
    }

    /// POSTs one chat completion; returns the content of every choice.
    func complete(_ question: String, shouldStop: () -> Bool = { false }) throws -> [String] {
        var headers = ["Content-Type: application/json", "Accept: application/json"]
        if let key = endpoint.apiKey { headers.append("Authorization: Bearer \(key)") }
        let subject = redactedURL
        let response: HTTPRequest.Response
        do {
            response = try HTTPRequest.post(endpoint.url.appendingPathComponent("chat/completions"), headers: headers,
                                            body: requestBody(question: question), timeout: endpoint.timeout, shouldStop: shouldStop)
        } catch let failure as HTTPRequest.Failure {
            if failure == .stopped { throw MethodError(.cancelled, "request to \(subject)", "stopped") }
            throw MethodError(.llmRequestFailed, subject, failure.description)
        }
        guard (200..<300).contains(response.status) else {
            let snippet = String(decoding: response.body.prefix(200), as: UTF8.self)
            throw MethodError(.llmRequestFailed, subject, "HTTP \(response.status): \(snippet)")
        }
        return try Self.choices(fromResponse: response.body, subject: subject)
    }

    static func choices(fromResponse data: Data, subject: String) throws -> [String] {
        guard case .object(let object)? = try? JSONDecoder().decode(JSONValue.self, from: data) else {
            throw MethodError(.llmBadReply, subject, "response is not a JSON object")
        }
        guard case .array(let choices)? = object["choices"], !choices.isEmpty else {
            throw MethodError(.llmBadReply, subject, "response has no 'choices'")
        }
        return try choices.enumerated().map { i, choice in
            guard case .object(let c) = choice, case .object(let message)? = c["message"],
                  case .string(let content)? = message["content"] else {
                throw MethodError(.llmBadReply, subject, "choices[\(i)] has no message.content string")
            }
            return content
        }
    }

    /// Splits a reply into sentences: line breaks and sentence ends split; list markers ("-", "*",
    /// "1." ...) and surrounding quotes are removed; a sentence without final punctuation gets a period;
    /// fragments of fewer than two words are dropped.
    public static func sentences(fromReply reply: String) -> [String] {
        var result: [String] = []
        for line in reply.split(whereSeparator: \.isNewline) {
            var text = line.trimmingCharacters(in: .whitespaces)
            // List markers: "-", "*", "•", "1.", "2)".
            if let first = text.first, "-*•".contains(first) { text.removeFirst() }
            let digits = text.prefix(while: \.isNumber)
            if !digits.isEmpty, text.dropFirst(digits.count).first.map({ ".)".contains($0) }) == true {
                text = String(text.dropFirst(digits.count + 1))
            }
            var current = ""
            let characters = Array(text)
            for (i, ch) in characters.enumerated() {
                current.append(ch)
                let atEnd = i + 1 == characters.count || characters[i + 1] == " "
                if ".!?".contains(ch), atEnd {
                    result.append(current)
                    current = ""
                }
            }
            result.append(current)
        }
        return result.compactMap { raw in
            var s = raw.trimmingCharacters(in: .whitespaces).trimmingCharacters(in: CharacterSet(charactersIn: "\"'“”"))
            s = s.trimmingCharacters(in: .whitespaces)
            guard s.split(separator: " ").count >= 2 else { return nil }
            if let last = s.last, !".!?".contains(last) { s += "." }
            return s
        }
    }

    /// The endpoint URL without user, password or query, for messages.
    public var redactedURL: String {
        guard var components = URLComponents(url: endpoint.url, resolvingAgainstBaseURL: false) else { return "LLM endpoint" }
        components.user = nil
        components.password = nil
        components.query = nil
        return components.string ?? "LLM endpoint"
    }
}
