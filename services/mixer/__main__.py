from bgm.server import serve
from services.mixer.servicer import build


def main() -> None:
    serve("mixer", build)


if __name__ == "__main__":
    main()
